"""A recurrent actor-critic on a partially observable CartPole, trained with TBPTT over rollouts.

CartPole (gymnax's ``CartPole-v1``) with the velocities hidden: the agent sees the cart's
position and the pole's angle only, so it must infer the velocities from what it saw before.
A GRU reads the observations; a linear policy head and a value head read its state. The
agent is trained by advantage actor-critic (A2C, Mnih et al. 2016, with GAE(lambda)) on
rollouts of ``--steps`` steps from ``--envs`` environments run in parallel, in which episodes
end mid-row (gymnax resets an environment as its episode ends):

* the rollout records, per step, the observation, the action and the environment's done
  flag (``done[t]``: the episode ended at step t);
* ``bptt_jax.streams.resets_from_dones`` turns them into the engine's resets, shifted one
  step (the state entering step t + 1 is fresh) and carried from one rollout to the next;
* the loss re-reads the rollout with ``bptt_jax.unroll`` from the carry the rollout started
  from; ``jax.grad`` of it runs the hand-written BPTT, truncated at the rollout's start
  (TBPTT over rollouts: the carry is passed on, its gradient is not).

A feed-forward agent (the same A2C with an MLP of the two observations) is trained beside it
as the baseline that cannot see the velocities. CartPole's usual return is 500 (the episode
limit); it counts as solved at an average of 475.

    pip install -e ".[rl]"                                 # gymnax
    python examples/recurrent_a2c.py                        # about a minute on 2 CPU cores
    python examples/recurrent_a2c.py --tiny                 # a few seconds (CI)

References:
  Mnih, Badia, Mirza, Graves, Lillicrap, Harley, Silver & Kavukcuoglu, "Asynchronous methods
  for deep reinforcement learning", ICML 2016 (A2C); Schulman, Moritz, Levine, Jordan &
  Abbeel, "High-dimensional continuous control using generalized advantage estimation",
  ICLR 2016 (GAE); Lange, "gymnax: a JAX-based reinforcement learning environment library",
  2022.
"""

import argparse
import importlib.util
import sys
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bptt_jax
from bptt_jax import streams

VISIBLE = jnp.array([0, 2])  # cart position and pole angle; the velocities (1, 3) are hidden


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
        self.cell = bptt_jax.GRU(hidden)
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


# ------------------------------------------------------------------ A2C
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
    gamma, lam = 0.99, 0.95

    def rollout(runner: Runner):
        def step(c, key):
            carry, obs, done, env_state, ret = c
            carry, (logits, _) = agent.act_step(runner.params, carry, obs, done)
            k_act, k_env = jax.random.split(key)
            action = jax.random.categorical(k_act, logits)
            keys = jax.random.split(k_env, args.envs)
            full, env_state, reward, done, _ = jax.vmap(env.step, (0, 0, 0, None))(
                keys, env_state, action, env_params
            )
            ret = ret + reward
            record = (obs, action, reward, done, ret)
            return (carry, full[:, VISIBLE], done, env_state, jnp.where(done, 0.0, ret)), record

        key, sub = jax.random.split(runner.key)
        init = (runner.carry, runner.obs, runner.done, runner.env_state, runner.returns)
        final, (obs, actions, rewards, dones, rets) = jax.lax.scan(
            step, init, jax.random.split(sub, args.steps)
        )  # fmt: skip
        return final, key, obs, actions, rewards, dones, rets

    def loss(params, carry0, obs, actions, rewards, dones, prev_done, last_value):
        resets, _ = streams.resets_from_dones(dones, prev_done=prev_done)
        logits, values = agent.sequence(params, carry0, obs, resets)
        # GAE(lambda) with the bootstrap value after the rollout; a done cuts the return
        v_next = jnp.concatenate([values[1:], last_value[None]])
        v_next = jax.lax.stop_gradient(jnp.where(dones, 0.0, v_next))
        deltas = rewards + gamma * v_next - jax.lax.stop_gradient(values)

        def back(adv, x):
            delta, done = x
            adv = delta + gamma * lam * jnp.where(done, 0.0, adv)
            return adv, adv

        _, adv = jax.lax.scan(back, jnp.zeros_like(last_value), (deltas, dones), reverse=True)
        target = adv + jax.lax.stop_gradient(values)
        logp = jax.nn.log_softmax(logits)
        chosen = jnp.take_along_axis(logp, actions[..., None], -1)[..., 0]
        norm_adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        entropy = -jnp.sum(jnp.exp(logp) * logp, -1).mean()
        return (-(chosen * norm_adv).mean() + 0.5 * ((values - target) ** 2).mean()
                - 0.01 * entropy)  # fmt: skip

    def update(runner: Runner, _):
        (carry, obs_next, done, env_state, ret), key, obs, actions, rewards, dones, rets = (
            rollout(runner)
        )
        # the bootstrap value: one more step of the acting policy on the next observation
        _, (_, last_value) = agent.act_step(runner.params, carry, obs_next, done)
        grads = jax.grad(loss)(
            runner.params, runner.carry, obs, actions, rewards, dones, runner.done,
            jax.lax.stop_gradient(last_value),
        )  # fmt: skip
        updates, opt_state = tx.update(grads, runner.opt_state, runner.params)
        params = optax.apply_updates(runner.params, updates)
        finished = jnp.sum(jnp.where(dones, rets, 0.0))
        count = jnp.sum(dones)
        return Runner(params, opt_state, env_state, obs_next, carry, done, key, ret,
                      runner.finished + finished, runner.count + count), None  # fmt: skip

    @partial(jax.jit, static_argnums=1)
    def run(runner, n):
        runner = runner._replace(finished=jnp.zeros(()), count=jnp.zeros((), jnp.int32))
        return jax.lax.scan(update, runner, None, length=n)[0]

    return run


def train(agent, args, seed: int):
    """Train ``agent``; returns the mean return of the episodes of each report interval."""
    import gymnax

    env, env_params = gymnax.make("CartPole-v1")
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(args.lr))
    key = jax.random.key(seed)
    k_init, k_env, key = jax.random.split(key, 3)
    params = agent.init(k_init, env.action_space(env_params).n)
    obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(k_env, args.envs), env_params)
    runner = Runner(params, tx.init(params), env_state, obs[:, VISIBLE],
                    agent.zero_carry(args.envs), jnp.zeros((args.envs,), bool), key,
                    jnp.zeros((args.envs,)), jnp.zeros(()), jnp.zeros((), jnp.int32))  # fmt: skip
    run = make_update(agent, env, env_params, tx, args)
    curve = []
    per_report = max(1, args.updates // args.reports)
    for _ in range(args.updates // per_report):
        runner = run(runner, per_report)
        curve.append(float(runner.finished / jnp.maximum(runner.count, 1)))
    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32, help="rollout length (TBPTT window)")
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--reports", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few updates (CI)")
    args = parser.parse_args()
    if importlib.util.find_spec("gymnax") is None:
        print("gymnax is not installed: skipping (pip install -e '.[rl]')")
        return 0
    if args.tiny:
        args.envs, args.steps, args.updates, args.hidden, args.reports = 4, 8, 6, 8, 2
    steps = args.envs * args.steps * args.updates
    print(f"A2C on CartPole-v1 with the velocities hidden: {args.envs} envs x {args.steps} "
          f"steps per rollout, {args.updates} updates ({steps:,} environment steps)")  # fmt: skip
    results = {}
    for name, agent in (("gru", Recurrent(args.hidden)), ("feed-forward", FeedForward(args.hidden))):
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
