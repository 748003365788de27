"""Learning to Draft: training the RL depth and size policies by counterfactual replay.

This package trains; running a trained policy is :mod:`ltd.control`'s job (its
observations, policy loading and the controller), which this package imports and
never the reverse.

Modules, in the order data flows through them:

- :mod:`ltd.rl.latency` -- the machine's cost model (``ltd profile``).
- :mod:`ltd.rl.traces` -- recorded max-depth draft trees along greedy outputs
  (``ltd record``) and the exact accepted length of any (depth, size) choice.
- :mod:`ltd.rl.sources` -- one cycle at a time, replayed from traces or run live.
- :mod:`ltd.rl.envs` -- gymnasium depth and size environments (replay and live).
- :mod:`ltd.rl.oracle` -- the hindsight-optimal schedule and replay evaluation.
- :mod:`ltd.rl.policy` -- new PPO models and saving trained policies with their spec.
- :mod:`ltd.rl.train` -- PPO training, including the co-adaptive schedule.

Nothing is imported here, so ``import ltd.rl`` stays cheap; gymnasium and
stable-baselines3 are needed only by the modules that use them.
"""
