// Offsets outside the raw operators' contract, run through every kernel family on the emulator.
#pragma once

namespace block_attn::emulated_test {

// Runs forward and both backward modes (bf16 at head_dim 64 and 128, float32) on offsets that are
// past the end, negative, decreasing, or longer than max_seqlen, on emulated sm_90 and sm_86.
// Prints one line per run and returns the number of failures.
int check_offsets_outside_contract();

}  // namespace block_attn::emulated_test
