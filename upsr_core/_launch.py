"""The parent process id as the package is first imported (before torch loads, ~3 s): the CLI of a
torchrun rank compares it with the parent it has when it asks for the launcher's death signal, so
a launcher that died while the rank was still starting is noticed too (see ``cli``)."""
import os

PARENT_AT_IMPORT = os.getppid()
