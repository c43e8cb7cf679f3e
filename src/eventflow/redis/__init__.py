"""Redis access: connections, the Function library, and its typed wrappers."""
