"""The attention math: exact blocked kernels with decomposed relative-position terms, and the dispatcher that picks one."""
