"""Faults injected into real processes: Redis paused, restarted or killed, workers killed, the
network cut; ``python -m tests.faults`` runs the long suite."""
