"""Test support: tiny models and data, synthetic runs, and one factory each for probe sets,
snapshots and monitors. Helpers only: tests live in tests/, scripts run by path stay there."""
