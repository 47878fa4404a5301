"""The gate's benchmark harness (`make bench`): real aegisd, real upstreams, load from wrk.

Timing targets live here and are printed PASS/FAIL; they never become test assertions.
"""
