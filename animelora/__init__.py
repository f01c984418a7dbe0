"""The `animelora` command line: the top layer of the project.

It sits above everything else (``lora/`` the Prefect-free library, ``tasks/`` and ``flows/``
the Prefect layer, ``deployments/`` serving them), so it may import any of them, while
``lora/`` imports none of them. Run it as ``animelora ...`` or ``python -m animelora ...``
(the latter is what ``accelerate launch`` and ``torchrun`` need).
"""
