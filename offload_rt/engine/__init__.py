"""The expert offloading engine: tiers with budgets, an expert cache per tier, prefetch."""
