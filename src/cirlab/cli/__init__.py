"""Console entry points: argument parsing and printing only; the work is in the library modules."""
