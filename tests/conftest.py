import os

# kernels.py's Triton kernels run on the CPU in the tests, through Triton's interpreter. Triton
# reads this variable when it is first imported (it decorates its own library then) and again
# at launch, so it is set here, before any test module can import Triton through the code.
os.environ["TRITON_INTERPRET"] = "1"
