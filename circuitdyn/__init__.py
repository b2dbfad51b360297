"""circuitdyn: what did continual pre-training change inside my model?

Data flows one way: checkpoints -> model -> probes -> attribution -> circuits -> diff/timeline -> viz/cli.
"""

import warnings

# TransformerLens 3.9 announces HookedTransformer's removal in 4.0 on every construction; we pin <4.
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
# peft asks transformers 5 a deprecated question on every LoRA wrap; it is not the user's to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
