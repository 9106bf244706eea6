import time, sys, jax, jax.numpy as jnp, numpy as np, bptt_jax as B
T,Bs,D,H = [int(a) for a in sys.argv[1:5]]
O = 32
for cell in [B.Elman(H), B.LSTM(H), B.GRU(H)]:
    k = jax.random.split(jax.random.key(0), 4)
    p = cell.init(k[0], D); ro = B.init_readout(k[1], H, O)
    xs = jax.random.normal(k[2], (T,Bs,D)); tg = jax.random.randint(k[3], (T,Bs), 0, O)
    fs = {}
    for bk in ['manual','autodiff']:
        f = jax.jit(jax.value_and_grad(lambda p, ro, xs, bk=bk: B.sequence_loss(cell,p,ro,xs,tg,backward=bk), argnums=(0,1,2)))
        c = f.lower(p,ro,xs).compile(); ma = c.memory_analysis()
        fs[bk] = (c, ma.temp_size_in_bytes)
    ts = {bk: [] for bk in fs}
    for bk in fs: jax.block_until_ready(fs[bk][0](p,ro,xs))
    for r in range(7):
        for bk in fs:
            t0=time.perf_counter(); jax.block_until_ready(fs[bk][0](p,ro,xs)); ts[bk].append(time.perf_counter()-t0)
    m,a = np.median(ts['manual']), np.median(ts['autodiff'])
    print(f"{type(cell).__name__:6} manual {m*1e3:8.2f} ms  autodiff {a*1e3:8.2f} ms  speedup {a/m:.2f}x   temp MiB manual {fs['manual'][1]/2**20:8.2f} autodiff {fs['autodiff'][1]/2**20:8.2f}  units(T*B*H) {fs['manual'][1]/(T*Bs*H*4):.2f} vs {fs['autodiff'][1]/(T*Bs*H*4):.2f}")
