"""Test helpers that are more than fixtures: a throwaway PostgreSQL server, claimer processes."""
