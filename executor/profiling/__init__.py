"""The profiler's parts; `pensieve profile` is executor/profiler.py."""
