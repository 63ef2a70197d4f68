"""The small-scale reproduction of the paper: stages, claims and the report (run by reproduce.py)."""
