"""notifyfs: a FUSE-protocol shared folder whose file-change notifications cross to the guest."""

__version__ = "0.1.0"
