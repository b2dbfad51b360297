"""circuitdyn: what did continual pre-training change inside my model?

Data flows one way: checkpoints -> model -> probes -> attribution -> circuits -> diff/timeline -> viz/cli.
"""

import warnings

# TransformerLens 3.9 announces HookedTransformer's removal in 4.0 on every construction; we pin <4.
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

__version__ = "0.1.0"
