// Everything the per-ISA kernel units include, before they set their target: the standard library,
// ATen's parallel_for, the half types, the shared task runner. Code declared here keeps the
// baseline ISA whatever the unit (a target applies to what is declared after it), so the copies
// of inline functions that units emit alike are baseline code and any may be kept by the linker.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/task_runner.h"
#include "params.h"
