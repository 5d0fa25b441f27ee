"""The study's stages (``stages``), the whole job (``job``) and the paper figures (``figures``)."""
