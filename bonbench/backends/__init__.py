"""Generation backends behind one protocol (``Backend``)."""

from bonbench.backends.base import Backend, Candidate, Generation, Prompt, SamplingParams

__all__ = ["Backend", "Candidate", "Generation", "Prompt", "SamplingParams"]
