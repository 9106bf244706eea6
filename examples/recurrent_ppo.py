"""A recurrent actor-critic on a partially observable CartPole, trained with TBPTT over rollouts.

CartPole (gymnax's ``CartPole-v1``) with the velocities hidden: the agent sees the cart's
position and the pole's angle only, so it must infer the velocities from what it saw before.
A GRU reads the observations; a linear policy head and a value head read its state. The agent
is trained by PPO (Schulman et al. 2017; GAE(lambda) advantages) on rollouts of ``--steps``
steps from ``--envs`` environments run in parallel, in which episodes end mid-row (gymnax
resets an environment as its episode ends):

* the rollout records, per step, the observation, the action and the environment's done
  flag (``done[t]``: the episode ended at step t);
* ``bptt_jax.streams.resets_from_dones`` turns them into the engine's resets, shifted one
  step (the state entering step t + 1 is fresh), the previous rollout's last done resetting
  the first step;
* the loss re-reads each rollout row with ``bptt_jax.unroll`` from the carry the row started
  the rollout with; ``jax.grad`` of it runs the hand-written BPTT, truncated at the
  rollout's start (TBPTT over rollouts: the carry is passed on, its gradient is not).

A feed-forward agent (the same PPO with an MLP of the two observations) is trained beside it:
the baseline that cannot see the velocities. CartPole's usual return is 500, the episode
limit (it counts as solved at an average of 475).

    pip install -e ".[rl]"                                 # gymnax
    python examples/recurrent_ppo.py                        # about a minute on 2 CPU cores
    python examples/recurrent_ppo.py --tiny                 # a few seconds (CI)

References:
  Schulman, Wolski, Dhariwal, Radford & Klimov, "Proximal policy optimization algorithms",
  2017 (arXiv:1707.06347); Schulman, Moritz, Levine, Jordan & Abbeel, "High-dimensional
  continuous control using generalized advantage estimation", ICLR 2016; Lange, "gymnax: a
  JAX-based reinforcement learning environment library", 2022.
"""

import argparse
import importlib.util
import sys
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import bptt_jax
from bptt_jax import streams

VISIBLE = jnp.array([0, 2])  # cart position and pole angle; the velocities (1, 3) are hidden
SCALE = jnp.array([1 / 2.4, 1 / 0.2095])  # each by its termination threshold: in [-1, 1]
REWARD_SCALE = 0.1


class Heads(NamedTuple):
    """The policy's logits and the value, both linear in the features."""

    w_pi: jax.Array
    b_pi: jax.Array
    w_v: jax.Array
    b_v: jax.Array


def init_heads(key, features: int, actions: int) -> Heads:
    k1, k2 = jax.random.split(key)
    return Heads(
        0.01 * jax.random.normal(k1, (features, actions)), jnp.zeros((actions,)),
        jax.random.normal(k2, (features, 1)) / features**0.5, jnp.zeros((1,)),
    )  # fmt: skip


def heads_of(h, p: Heads):
    return h @ p.w_pi + p.b_pi, (h @ p.w_v + p.b_v)[..., 0]


# ------------------------------------------------------------------ the two agents
class Recurrent:
    """The GRU agent: features are the GRU's hidden states, read with bptt_jax.unroll."""

    def __init__(self, hidden: int):
        self.cell = bptt_jax.GRU(hidden, init_scheme="orthogonal")  # LeCun-normal inputs
        self.hidden = hidden

    def init(self, key, actions):
        k1, k2 = jax.random.split(key)
        return (self.cell.init(k1, 2), init_heads(k2, self.hidden, actions))

    def zero_carry(self, n):
        return self.cell.zero_carry(n)

    def act_step(self, params, carry, obs, reset):
        """One step of the acting policy: the carry reset where an episode starts."""
        carry = jnp.where(reset[:, None], 0.0, carry)
        carry, h = self.cell.step(params[0], carry, obs)
        return carry, heads_of(h, params[1])

    def sequence(self, params, carry, obs, resets):
        """The rollout re-read by the library: hand-written BPTT under jax.grad."""
        hs, _ = bptt_jax.unroll(self.cell, params[0], obs, carry, resets=resets)
        return heads_of(hs, params[1])


class FeedForward:
    """The baseline: an MLP of the current observation only (no carry)."""

    def __init__(self, hidden: int):
        self.hidden = hidden

    def init(self, key, actions):
        k1, k2 = jax.random.split(key)
        return ({"w": jax.random.normal(k1, (2, self.hidden)) / 2**0.5,
                 "b": jnp.zeros((self.hidden,))}, init_heads(k2, self.hidden, actions))  # fmt: skip

    def zero_carry(self, n):
        return jnp.zeros((n, 1))

    def act_step(self, params, carry, obs, reset):
        return carry, heads_of(jnp.tanh(obs @ params[0]["w"] + params[0]["b"]), params[1])

    def sequence(self, params, carry, obs, resets):
        return heads_of(jnp.tanh(obs @ params[0]["w"] + params[0]["b"]), params[1])


# ------------------------------------------------------------------ PPO
class Runner(NamedTuple):
    """What one update hands the next: the environments, the agent's carry, the last done."""

    params: object
    opt_state: object
    env_state: object
    obs: jax.Array  # (N, 2) the observation to act on next
    carry: jax.Array  # the carry entering the next rollout (before its first reset)
    done: jax.Array  # (N,) whether the last step of the previous rollout ended an episode
    key: jax.Array
    returns: jax.Array  # (N,) each environment's running episode return
    finished: jax.Array  # () sum of the returns of episodes finished in this update
    count: jax.Array  # () how many finished


def make_update(agent, env, env_params, tx, args):
    gamma, lam, clip_eps = 0.99, 0.95, 0.2

    def rollout(runner: Runner):
        def step(c, key):
            carry, obs, done, env_state, ret = c
            carry, (logits, value) = agent.act_step(runner.params, carry, obs, done)
            k_act, k_env = jax.random.split(key)
            action = jax.random.categorical(k_act, logits)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], 1)[:, 0]
            keys = jax.random.split(k_env, args.envs)
            full, env_state, reward, terminated, truncated, _ = jax.vmap(env.step, (0, 0, 0, None))(
                keys, env_state, action, env_params
            )
            done = terminated | truncated  # either way the next step starts a new episode
            ret = ret + reward
            record = (obs, action, logp, value, reward, done, ret)
            obs = full[:, VISIBLE] * SCALE
            return (carry, obs, done, env_state, jnp.where(done, 0.0, ret)), record

        key, sub = jax.random.split(runner.key)
        init = (runner.carry, runner.obs, runner.done, runner.env_state, runner.returns)
        final, records = jax.lax.scan(step, init, jax.random.split(sub, args.steps))
        return final, key, records

    def advantages(values, rewards, dones, last_value):
        """GAE(lambda) from the acting policy's values; a done cuts the return."""
        v_next = jnp.where(dones, 0.0, jnp.concatenate([values[1:], last_value[None]]))
        deltas = rewards + gamma * v_next - values

        def back(adv, x):
            delta, done = x
            adv = delta + gamma * lam * jnp.where(done, 0.0, adv)
            return adv, adv

        return jax.lax.scan(back, jnp.zeros_like(last_value), (deltas, dones), reverse=True)[1]

    def loss(params, batch):
        """PPO's clipped objective on whole rollout rows, re-read from the carry each row
        started the rollout with: jax.grad runs the hand-written BPTT (truncated there)."""
        carry0, obs, resets, actions, old_logp, adv, target = batch
        logits, values = agent.sequence(params, carry0, obs, resets)
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, actions[..., None], -1)[..., 0]
        ratio = jnp.exp(logp - old_logp)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1).mean()
        return -surrogate.mean() + 0.5 * ((values - target) ** 2).mean() - 0.01 * entropy

    def update(runner: Runner, _):
        (carry, obs_next, done, env_state, ret), key, records = rollout(runner)
        obs, actions, logp, values, rewards, dones, rets = records
        # the bootstrap value: one more step of the acting policy on the next observation
        _, (_, last_value) = agent.act_step(runner.params, carry, obs_next, done)
        # rewards scaled to 0.1 a step: returns up to ~10, so that the value's error does not
        # swamp the policy's gradient under the shared clipping of the global norm
        adv = advantages(values, REWARD_SCALE * rewards, dones, last_value)
        # TBPTT over rollouts: resets from the done flags, shifted one step, the previous
        # rollout's last done resetting step 0; the carry passed on, its gradient not
        resets, _ = streams.resets_from_dones(dones, prev_done=runner.done)
        data = (runner.carry, obs, resets, actions, logp, adv, adv + values)
        by_row = (0, 1, 1, 1, 1, 1, 1)  # the env (row) axis of each

        def epoch(c, key):
            params, opt_state = c
            rows = jax.random.permutation(key, args.envs).reshape(args.minibatches, -1)

            def minibatch(c, idx):
                params, opt_state = c
                batch = tuple(jnp.take(a, idx, axis=ax) for a, ax in zip(data, by_row))
                grads = jax.grad(loss)(params, batch)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            return jax.lax.scan(minibatch, (params, opt_state), rows)[0], None

        key, sub = jax.random.split(key)
        (params, opt_state), _ = jax.lax.scan(
            epoch, (runner.params, runner.opt_state), jax.random.split(sub, args.epochs)
        )
        finished = jnp.sum(jnp.where(dones, rets, 0.0))
        return Runner(params, opt_state, env_state, obs_next, carry, done, key, ret,
                      runner.finished + finished, runner.count + jnp.sum(dones)), None  # fmt: skip

    @partial(jax.jit, static_argnums=1)
    def run(runner, n):
        runner = runner._replace(finished=jnp.zeros(()), count=jnp.zeros((), jnp.int32))
        return jax.lax.scan(update, runner, None, length=n)[0]

    return run


def train(agent, args, seed: int):
    """Train ``agent``; returns the mean return of the episodes of each report interval."""
    import gymnax

    env, env_params = gymnax.make("CartPole-v1")
    steps_total = args.updates * args.epochs * args.minibatches
    lr = optax.linear_schedule(args.lr, 0.0, steps_total)  # annealed to 0, as PPO does
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr))
    key = jax.random.key(seed)
    k_init, k_env, key = jax.random.split(key, 3)
    params = agent.init(k_init, env.action_space(env_params).n)
    obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(k_env, args.envs), env_params)
    runner = Runner(params, tx.init(params), env_state, obs[:, VISIBLE] * SCALE,
                    agent.zero_carry(args.envs), jnp.zeros((args.envs,), bool), key,
                    jnp.zeros((args.envs,)), jnp.zeros(()), jnp.zeros((), jnp.int32))  # fmt: skip
    run = make_update(agent, env, env_params, tx, args)
    curve = []
    per_report = max(1, args.updates // args.reports)
    for _ in range(args.updates // per_report):
        runner = run(runner, per_report)
        curve.append(float(runner.finished / jnp.maximum(runner.count, 1)))
    return curve


def make_parser() -> argparse.ArgumentParser:
    """The script's options (``make_parser().parse_args([])``: the defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="rollout length (TBPTT window)")
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--reports", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few updates (CI)")
    return parser


def main():
    args = make_parser().parse_args()
    if importlib.util.find_spec("gymnax") is None:
        print("gymnax is not installed: skipping (pip install -e '.[rl]')")
        return 0
    if args.tiny:
        args.envs, args.steps, args.updates, args.hidden, args.reports = 4, 8, 6, 8, 2
        args.epochs, args.minibatches = 2, 2
    steps = args.envs * args.steps * args.updates
    print(f"PPO on CartPole-v1 with the velocities hidden: {args.envs} envs x {args.steps} "
          f"steps per rollout, {args.updates} updates ({steps:,} environment steps)")  # fmt: skip
    results = {}
    agents = {"gru": Recurrent(args.hidden), "feed-forward": FeedForward(args.hidden)}
    for name, agent in agents.items():
        start = time.perf_counter()
        curve = train(agent, args, args.seed)
        took = time.perf_counter() - start
        results[name] = curve[-1]
        shown = " ".join(f"{r:.0f}" for r in curve)
        print(f"{name:>13}: mean episode return per report: {shown}  ({took:.1f} s)", flush=True)
    print(f"final return {results['gru']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
