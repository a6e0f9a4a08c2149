"""Every environment variable fsdpqdiag reads or sets, named once.

A user sets the first few; fsdpqdiag sets the rest for the processes it starts (its ranks,
the guarded processes of ``fsdpqdiag watch``) and reads them there. Constants only, no
imports: the weight guard's ``sitecustomize`` reads them inside the user's own process.
"""

# Set by the user.
# Where built model presets are kept (default: $XDG_CACHE_HOME/fsdpqdiag or ~/.cache/fsdpqdiag).
CACHE = "FSDPQDIAG_CACHE"
# fork | spawn: how ranks start (launcher.rank_start).
RANK_START = "FSDPQDIAG_RANK_START"
# on | off: bitsandbytes' CPU kernel path, whatever the CPU (stack.bnb_cpu_path).
BNB_CPU_REPACK = "FSDPQDIAG_BNB_CPU_REPACK"

# Set by the launcher in each rank it starts.
# The file a rank writes its result to (rank.runtime).
RESULT = "FSDPQDIAG_RESULT"
# The file a launch's first rank writes the stack it runs on to (rank.env.capture).
STACK = "FSDPQDIAG_STACK_ENV"

# Set by ``fsdpqdiag watch`` in the guarded command's environment (weightguard.watch, auto);
# ``--help`` names them by their common prefix.
GUARD_PREFIX = "FSDPQDIAG_GUARD_"
# The directory each guarded process writes its record into; its presence arms the guard.
GUARD_DIR = "FSDPQDIAG_GUARD_DIR"
GUARD_PARAMS = "FSDPQDIAG_GUARD_PARAMS"
GUARD_ACTION = "FSDPQDIAG_GUARD_ACTION"
GUARD_EVERY = "FSDPQDIAG_GUARD_EVERY"
GUARD_INJECT = "FSDPQDIAG_GUARD_INJECT"
GUARD_FIX = "FSDPQDIAG_GUARD_FIX"
# Where the job's report goes, told to the other nodes (weightguard.job).
GUARD_REPORT = "FSDPQDIAG_GUARD_REPORT"
# Seconds the node writing a multi-node job's report waits for the others' records.
GUARD_GATHER_TIMEOUT = "FSDPQDIAG_GUARD_GATHER_TIMEOUT"
# Set by the first process of a torchrun rank that arms the guard, to its pid: its children
# inherit it and so do not publish a record under that rank (weightguard.job).
GUARD_RANK_PROCESS = "FSDPQDIAG_GUARD_RANK_PROCESS"
