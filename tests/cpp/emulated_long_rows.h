// Rows longer than kMaxKeysPerAccumulator, and the int32 bounds of the kernels' helpers.
#pragma once

namespace block_attn::emulated_test {

// Runs every kernel family over rows longer than kMaxKeysPerAccumulator (set small for this
// test: the folded sums run on small problems) against float64, and checks the causal bounds and
// tile counts at the int32 edge. Prints one line per check and returns the number of failures.
int check_long_rows();

}  // namespace block_attn::emulated_test
