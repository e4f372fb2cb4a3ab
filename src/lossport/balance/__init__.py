"""Balancers: turn the loss parts of a batch into weights (see :mod:`lossport.balance.base`)."""

from .base import KINDS, PREFERENCE, Balancer, Context, aliases, available, kind_of, register, resolve, suggest
from .gradient import IMTLG, MGDA, AlignedMTL, CAGrad, ConFIG, DualProj, FairGrad, GradVac, NashMTL, PCGrad, UPGrad
from .gramian_base import GramianBalancer
from .learned import FAMO, IMTLL, GradNorm, LearnedBalancer, Uncertainty
from .loss_level import DWA, GLS, RLW, SI, STCH, CoV, Normalize
from .static import EqualWeights, Static
from .surgery import DBMTL, GradDrop

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "KINDS",
    "MGDA",
    "PREFERENCE",
    "RLW",
    "SI",
    "STCH",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "CoV",
    "ConFIG",
    "Context",
    "DualProj",
    "EqualWeights",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GramianBalancer",
    "LearnedBalancer",
    "NashMTL",
    "Normalize",
    "PCGrad",
    "Static",
    "UPGrad",
    "Uncertainty",
    "aliases",
    "available",
    "kind_of",
    "register",
    "resolve",
    "suggest",
]

from .robust import ExcessMTL, Krum, TrimmedMean

__all__ += ["ExcessMTL", "Krum", "TrimmedMean"]

from .priority import PCD  # noqa: E402
from .stochastic import CRMOGM, MoCo, MoDo, SDMGrad  # noqa: E402

__all__ += ["CRMOGM", "PCD", "MoCo", "MoDo", "SDMGrad"]

from .bilevel import FORUM, LDCMTL, MOML, AutoLambda  # noqa: E402
from .group import GO4Align  # noqa: E402

__all__ += ["FORUM", "LDCMTL", "MOML", "AutoLambda", "GO4Align"]

from .preference import COSMOS, PBI  # noqa: E402

__all__ += ["COSMOS", "PBI"]

from .ntk import NTKMTL, NTKMTLSR  # noqa: E402

__all__ += ["NTKMTL", "NTKMTLSR"]
