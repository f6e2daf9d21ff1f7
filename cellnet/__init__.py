"""cellnet: residual breast tumour cellularity from H&E patches (Rakhlin et al. 2019).

Importing the package registers every custom Keras object, so ``keras.saving.load_model``
reloads any cellnet ``.keras`` file after ``import cellnet``.
"""
from cellnet.quiet import import_tensorflow

import_tensorflow()  # before any module below imports it, so its start-up chatter is filtered

from cellnet import augment, features, gbt, losses, models, training  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
