// Fiber context switch of the CPU emulation (runtime.cpp): a hand-written one on x86-64 (no
// signal-mask system call per switch, unlike swapcontext), ucontext elsewhere.
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {
namespace {

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *from, continues on
// `to`. SysV ABI: rbx, rbp, r12-r15 are callee-saved (x87/MXCSR control words are never changed).
extern "C" void cuda_emu_switch(void** from, void* to);
extern "C" void cuda_emu_trampoline();
asm(R"(
.text
.globl cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
.globl cuda_emu_trampoline
.type cuda_emu_trampoline,@function
cuda_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
.size cuda_emu_trampoline, .-cuda_emu_trampoline
)");

struct Context {
  void* sp = nullptr;
};
void make_context(Context& c, char* stack_base, std::size_t size, void (*fn)(void*)) {
  char* top = stack_base + size;
  auto* sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15}) - 7;
  sp[0] = nullptr;                                        // r15
  sp[1] = nullptr;                                        // r14
  sp[2] = reinterpret_cast<void*>(fn);                    // r13
  sp[3] = nullptr;                                        // r12: fn's argument
  sp[4] = nullptr;                                        // rbx
  sp[5] = nullptr;                                        // rbp
  sp[6] = reinterpret_cast<void*>(&cuda_emu_trampoline);  // ret: rsp 16-aligned at the call
  c.sp = sp;
}
void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
// Elsewhere: ucontext (slower: it saves the signal mask with a system call per switch).
struct Context {
  ucontext_t uc;
};
void (*g_entry)(void*) = nullptr;
void ucontext_entry() { g_entry(nullptr); }
void make_context(Context& c, char* stack_base, std::size_t size, void (*fn)(void*)) {
  g_entry = fn;
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, &ucontext_entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

}  // namespace
}  // namespace cuda_emu
