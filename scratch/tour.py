import jax, jax.numpy as jnp, optax
import bptt_jax

cell = bptt_jax.LSTM(hidden_size=64, forget_bias=1.0)        # or Elman(64, "tanh"), GRU(64)
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = cell.init(k1, input_size=16)                        # LSTMParams(w_x, w_h, b)
readout = bptt_jax.init_readout(k2, 64, 10)                  # ReadoutParams(w_hy, b_y)

xs = jax.random.normal(k3, (100, 32, 16))                    # (T, B, D), time-major
targets = jnp.zeros((100, 32), jnp.int32)                    # class per step, (T, B)
lengths = jnp.full((32,), 100).at[:8].set(60)                # variable lengths...
mask = jnp.arange(100)[:, None] < lengths                    # ...as a right-padding mask (T, B)

# jax.grad runs the hand-written BPTT (a jax.custom_vjp); grads have the params' types.
loss_fn = lambda p, ro: bptt_jax.sequence_loss(cell, p, ro, xs, targets, mask=mask)
loss, (g, g_ro) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(params, readout)

opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
state = opt.init((params, readout))
updates, state = opt.update((g, g_ro), state)
params, readout = optax.apply_updates((params, readout), updates)

# Any loss of your own on the hidden states also gets the hand-written backward:
hs, carry = bptt_jax.unroll(cell, params, xs, mask=mask)     # hs (T, B, H), LSTMCarry(h, c)
