"""Thin ctypes wrappers for Linux system calls that the os module lacks."""
