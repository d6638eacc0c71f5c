"""seqvae: recurrent latent-variable generative models in PyTorch.

    seqvae.DRAW      DRAW (Gregor et al. 2015) with "none" or "filterbank" read and write heads
    seqvae.VRNN      the variational RNN (Chung et al. 2015); prior="standard" gives VRNN-I
    seqvae.RNN       an RNN baseline with the same output heads and no latent variables
    seqvae.SRNN      the stochastic recurrent network (Fraccaro et al. 2016)
    seqvae.elbo, seqvae.iwae_bound, seqvae.fivo_bound, seqvae.log_likelihood
                     per-example bounds and estimates of log p(x), in nats
    seqvae.pretrained("draw-attention")
                     a model shipped with the package (seqvae.zoo.available() lists them)

Submodules: attention (filterbank maths), distributions (likelihood heads), cells, nets, recurrent
(the contract and the time loop), objectives, models (the registry), data, run, train, evaluate,
views, viz, zoo (pretrained models), cli. Importing seqvae does no work beyond importing torch and einops.
"""

from . import attention
from .draw import DRAW
from .objectives import elbo, fivo_bound, iwae_bound, log_likelihood
from .srnn import SRNN
from .vrnn import RNN, VRNN
from .zoo import pretrained

__all__ = ["DRAW", "VRNN", "RNN", "SRNN", "elbo", "iwae_bound", "fivo_bound", "log_likelihood", "attention", "pretrained"]
__version__ = "0.1.0"
