"""Users' tools built on the public APIs of ``pruning`` and ``trainer``: the demo, its report and the planner."""
