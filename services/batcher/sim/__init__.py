"""Discrete-event simulator of a decode + prefetch GPU pair: cost model, workloads, loop."""
