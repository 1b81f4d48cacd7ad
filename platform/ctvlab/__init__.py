"""ctvlab: radiotherapy target definition for glioblastoma from diffusion and metabolic MRI.

Implements Tran et al., "Novel radiotherapy target definition using AI-driven predictions of
glioblastoma recurrence from metabolic and diffusion MRI", npj Digital Medicine (2025).
"""

__version__ = "0.1.0"
