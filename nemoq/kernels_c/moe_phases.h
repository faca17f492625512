/* The MoE phases as moe.c (float32 activations) and moe_q8.c (Q8_0 activations) export them:
 * each computes rows [r0, r1) of one phase for every routed expert; moe_run.c sequences them
 * on its threads, moe.py can also call them one phase at a time. Arguments and return codes are
 * described at the definitions. */
#ifndef NEMOQ_MOE_PHASES_H
#define NEMOQ_MOE_PHASES_H

#include <stdint.h>

int nemoq_moe_supports(int type);

int nemoq_moe_up(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const float * x,
                 int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                 const int32_t * slot_token, const float * expert_scale, float * h, int64_t r0, int64_t r1);

int nemoq_moe_down(const uint8_t * down, int type, int64_t hidden, int64_t n_ff, const float * h,
                   int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                   const int32_t * slot_token, const float * slot_weight, const float * expert_scale,
                   float * out, int64_t r0, int64_t r1);

/* The float32 phases with the k-quants' sums of x (or h) per 32 values made once per call
 * (moe_slot_sums) instead of once per row range: for the driver, which hands out many ranges. */
int moe_slot_sums(int type, const float * base, int64_t n, int64_t n_slots, const int32_t * row_of, float * sums);
int moe_up_rows(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const float * x, int64_t n_groups,
                const int32_t * group_expert, const int64_t * group_start, const int32_t * slot_token,
                const float * expert_scale, const float * sums, float * h, int64_t r0, int64_t r1);
int moe_down_rows(const uint8_t * down, int type, int64_t hidden, int64_t n_ff, const float * h, int64_t n_groups,
                  const int32_t * group_expert, const int64_t * group_start, const int32_t * slot_token,
                  const float * slot_weight, const float * expert_scale, const float * sums, float * out,
                  int64_t r0, int64_t r1);

int nemoq_q8_block_values(int type);
int64_t nemoq_q8_unit(int type, int64_t n);
void nemoq_q8_quantize(const float * x, int64_t rows, int64_t n, int type, int8_t * q, float * d, float * ds,
                       float * s16);

int nemoq_moe_q8_up(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const int8_t * xq,
                    const float * xd, const float * xds, const float * xs16, int64_t n_groups, const int32_t * group_expert,
                    const int64_t * group_start, const int32_t * slot_token, const float * expert_scale,
                    float * h, int64_t r0, int64_t r1);

int nemoq_moe_q8_down(const uint8_t * down, int type, int64_t hidden, int64_t n_ff, const int8_t * hq,
                      const float * hd, const float * hds, const float * hs16, int64_t n_groups, const int32_t * group_expert,
                      const int64_t * group_start, const int32_t * slot_token, const float * slot_weight,
                      const float * expert_scale, float * dots, float * out, int64_t r0, int64_t r1);

#endif
