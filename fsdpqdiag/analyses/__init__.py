"""The rank tasks of the commands other than ``reproduce``: localize, forensics, fix, matrix, preflight."""
