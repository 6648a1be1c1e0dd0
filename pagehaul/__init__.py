"""pagehaul's shared package (see ARCHITECTURE.md).

numpy's OpenBLAS starts a thread per core that spins waiting for matrix work, which pagehaul never
gives it: on a busy machine those threads take CPU from the sender's and receiver's own. Set before
any module imports numpy (every pagehaul module is imported through this package first); a value
the user set is kept.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
