"""The run: its directory, its record and the runners that fill it."""
