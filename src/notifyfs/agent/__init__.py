"""The guest side: mounting /dev/fuse and relaying the protocol to a server."""
