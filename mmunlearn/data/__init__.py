"""Data: the built-in synthetic benchmark and MLLMU-Bench / CLEAR readers."""
