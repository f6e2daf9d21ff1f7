"""cellnet: residual breast tumour cellularity from H&E patches (Rakhlin et al. 2019).

The package is laid out as the pipeline runs, imports flowing one way::

    data -> models -> training -> evaluation -> serving

with shared leaves at the top (``errors``, ``files``, ``classes``, ``preprocess``) and the
command line (``cli``, ``demo``, ``bench``) above everything. ``import cellnet`` loads no
TensorFlow, so ``cellnet --help`` answers at once; importing :mod:`cellnet.models` registers
every custom Keras object, after which ``keras.saving.load_model`` reloads any cellnet
``.keras`` file.
"""
__version__ = "0.10.0"
