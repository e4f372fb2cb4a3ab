"""Balancers: turn the loss parts of a batch into weights (see :mod:`lossport.balance.base`)."""

from .base import KINDS, PREFERENCE, Balancer, aliases, available, kind_of, register, resolve, suggest
from .gradient import IMTLG, MGDA, AlignedMTL, CAGrad, ConFIG, DualProj, FairGrad, GradVac, NashMTL, PCGrad, UPGrad
from .gramian_base import GramianBalancer
from .learned import FAMO, IMTLL, GradNorm, LearnedBalancer, Uncertainty
from .loss_level import DWA, GLS, RLW, SI, STCH, CoV, Normalize
from .static import EqualWeights, Static
from .surgery import DBMTL, GradDrop

__all__ = [
    "Balancer",
    "KINDS",
    "PREFERENCE",
    "aliases",
    "available",
    "kind_of",
    "register",
    "resolve",
    "suggest",
    "GramianBalancer",
    "MGDA",
    "PCGrad",
    "CAGrad",
    "IMTLG",
    "AlignedMTL",
    "UPGrad",
    "DualProj",
    "NashMTL",
    "FairGrad",
    "ConFIG",
    "GradVac",
    "GradDrop",
    "DBMTL",
    "Static",
    "EqualWeights",
    "Normalize",
    "SI",
    "GLS",
    "DWA",
    "RLW",
    "STCH",
    "CoV",
    "LearnedBalancer",
    "Uncertainty",
    "IMTLL",
    "FAMO",
    "GradNorm",
]

from .robust import ExcessMTL, Krum, TrimmedMean  # noqa: E402

__all__ += ["Krum", "TrimmedMean", "ExcessMTL"]

from .priority import PCD  # noqa: E402
from .stochastic import CRMOGM, MoCo, MoDo, SDMGrad  # noqa: E402

__all__ += ["PCD", "CRMOGM", "SDMGrad", "MoDo", "MoCo"]

from .bilevel import LDCMTL  # noqa: E402
from .group import GO4Align  # noqa: E402

__all__ += ["GO4Align", "LDCMTL"]
