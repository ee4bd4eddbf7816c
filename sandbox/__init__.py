"""Worker confinement: one sandbox profile value, rendered into the launcher."""
