"""Pure policy functions: they take snapshots (and an injected RNG / counter) and return decisions.

The live scheduler, the frontends and the simulator all call the same functions.
"""
