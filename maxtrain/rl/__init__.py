"""Reinforcement learning from a reward: rollouts as a data source, rewards, and their config."""
