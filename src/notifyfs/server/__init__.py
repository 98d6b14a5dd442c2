"""The host side: request dispatch, the passthrough filesystem, and the connection loop."""
