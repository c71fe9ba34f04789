# The LoRA adapters' rank-R loops of the cpu backend (_lowrank.h), for the modules that call
# them: _engine (the adapters in a step) and _testing (the loops on their own).
from libc.stdint cimport uint32_t

cdef extern from "_lowrank.h" nogil:
    uint32_t anecy_drop_hash(uint32_t x)
    void anecy_lowrank_choose(int avx2)
    const char* anecy_lowrank_path()
    void anecy_lora_down(const float* A, int R, int n_in, const float* x, int S, float* u,
                         uint32_t key, uint32_t threshold, float keep_scale)
    void anecy_lora_up(const float* B, int R, int n_out, const float* u, int S, float c,
                       float* y)
    void anecy_lora_back_out(const float* B, int R, int n_out, const float* dy, const float* u,
                             int S, float c, float* v, float* dB)
    void anecy_lora_back_in(int m, const float** A, const int* R, int n_in, const float* x,
                            const float** v, int S, float c, float** dA, float* dx,
                            float* row, const uint32_t* key, uint32_t threshold,
                            float keep_scale)
