"""Infrastructure every attention family shares: which backends can run (``backends``), the one
dispatcher (``dispatch``), input checks of the ops (``checks``) and of the registered operators
(``op_checks``), result types (``results``), ``BlockMask`` (``masks``), the block map's definition
(``block_map``), operator registration from one argument list (``library``), and the Triton helpers
(``triton_common``, imported only where Triton runs)."""
