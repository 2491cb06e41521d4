"""The benchmark stage's parts: typed rows (rows.py), checking and timing every built artifact
(measure.py), the fastest engine per target with the side-by-side table (best.py), and the measured
ratios fed back to the search (feedback.py)."""
