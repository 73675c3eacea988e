// placeholder compiled until the lora kernels land
#include <torch/library.h>
