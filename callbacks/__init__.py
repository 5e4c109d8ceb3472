"""Lightning callbacks of the framework."""
