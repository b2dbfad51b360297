"""Results in, tables and verdicts out; never opens a model: similarity and statistics, method noise, the change test,
diffs, timelines, transfer, learning dynamics, stopping rules, calibration results, and their text (`report`)."""
