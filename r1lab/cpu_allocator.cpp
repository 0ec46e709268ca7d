// torch's CPU allocator for a large model's training process: blocks freed by one step are handed to the next
// request of the same size, without letting the memory held grow past the highest the live blocks ever needed.
// Compiled on first use and installed by r1lab/cpu_allocator.py.
//
// Why: a training step at the Qwen2.5-0.5B shape allocates and frees gigabytes of activations and temporaries.
// Served by mmap and returned at each free (the policy that keeps the peak down, r1lab/runtime.py), every block is
// new memory that the kernel must fault in and zero: about a third of the forward and backward's time. Kept in
// glibc's heap, the same blocks fragment and the peak rises by 0.7 GB. Here a freed block of LARGE bytes or more is
// kept. A request of a kept block's exact size takes it (a step's activations repeat, layer after layer and step
// after step); any other request is assembled from kept blocks by moving their pages into a new range with mremap:
// the pages stay resident and filled, only their addresses change, so no block is ever faulted in while kept
// memory is left, and what is held (live + kept) never passes the highest live total seen.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <algorithm>

#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t PAGE = 4096;

struct Stats {
  size_t live = 0, kept = 0, peak_live = 0;
  uint64_t reused = 0, assembled = 0, mapped = 0, moved_bytes = 0, fresh_bytes = 0;
};

class KeepingAllocator final : public c10::Allocator {
 public:
  explicit KeepingAllocator(size_t large) : large_(large) {}

  c10::DataPtr allocate(size_t n) override {
    void* p = n >= large_ ? take(round_up(n)) : c10::alloc_cpu(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  static void release(void* p);

  Stats stats() {
    std::lock_guard<std::mutex> g(mutex_);
    return stats_;
  }

  // Unmap every kept block (a process done with training, before memory is needed elsewhere).
  void drop_kept() {
    std::lock_guard<std::mutex> g(mutex_);
    for (auto& [size, p] : kept_) munmap(p, size);
    kept_.clear();
    stats_.kept = 0;
  }

  bool give_back(void* p) {
    std::lock_guard<std::mutex> g(mutex_);
    auto it = sizes_.find(p);
    if (it == sizes_.end()) return false;
    size_t size = it->second;
    sizes_.erase(it);
    stats_.live -= size;
    kept_.emplace(size, p);
    stats_.kept += size;
    return true;
  }

 private:
  static size_t round_up(size_t n) { return (n + PAGE - 1) / PAGE * PAGE; }

  void* take(size_t size) {
    std::lock_guard<std::mutex> g(mutex_);
    void* p = nullptr;
    auto exact = kept_.find(size);
    if (exact != kept_.end()) {
      p = exact->second;
      kept_.erase(exact);
      stats_.kept -= size;
      stats_.reused++;
    } else {
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "r1lab's CPU allocator: out of memory mapping ", size, " bytes");
      size_t moved = kept_.empty() ? 0 : assemble(static_cast<char*>(p), size);
      (moved ? stats_.assembled : stats_.mapped)++;
      stats_.moved_bytes += moved;
      stats_.fresh_bytes += size - moved;
    }
    sizes_[p] = size;
    stats_.live += size;
    stats_.peak_live = std::max(stats_.peak_live, stats_.live);
    return p;
  }

  // Move kept pages into [dst, dst + size): the smallest kept block that covers what is still missing, else the
  // largest one whole, until the range is full or nothing is kept. Returns the bytes moved; the rest of the range
  // is fresh memory, faulted in when first touched.
  size_t assemble(char* dst, size_t size) {
    size_t filled = 0;
    while (filled < size && !kept_.empty()) {
      size_t missing = size - filled;
      auto it = kept_.lower_bound(missing);
      if (it == kept_.end()) it = std::prev(kept_.end());
      auto [block, src] = *it;
      size_t piece = std::min(block, missing);
      if (mremap(src, piece, piece, MREMAP_MAYMOVE | MREMAP_FIXED, dst + filled) == MAP_FAILED) break;
      kept_.erase(it);
      if (block > piece) kept_.emplace(block - piece, static_cast<char*>(src) + piece);  // the rest stays kept
      stats_.kept -= piece;
      filled += piece;
    }
    return filled;
  }

  const size_t large_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;  // live blocks of ours
  std::multimap<size_t, void*> kept_;        // kept blocks by size
  Stats stats_;
};

KeepingAllocator* instance = nullptr;
c10::Allocator* previous = nullptr;

void KeepingAllocator::release(void* p) {
  if (p == nullptr) return;
  if (!instance->give_back(p)) c10::free_cpu(p);  // a small block, from c10's own allocation
}

}  // namespace

extern "C" {

// Make this the CPU allocator for every tensor allocated from now on (tensors already allocated keep their own
// deleters). Returns 0, or 1 if it had been installed before.
int r1lab_install(size_t large) {
  int again = instance != nullptr;
  if (!again) {
    previous = c10::GetCPUAllocator();
    instance = new KeepingAllocator(large);  // never deleted: its blocks may outlive any uninstall
  }
  c10::SetCPUAllocator(instance, /*priority=*/UINT8_MAX);
  return again;
}

// Allocation from now on by the allocator that was in place before (blocks of ours still come back to us).
void r1lab_uninstall() {
  if (instance != nullptr && previous != nullptr) c10::SetCPUAllocator(previous, UINT8_MAX);
}

void r1lab_drop_kept() {
  if (instance != nullptr) instance->drop_kept();
}

// live, kept, peak_live, reused, assembled, mapped, moved_bytes, fresh_bytes
void r1lab_stats(uint64_t* out) {
  Stats s = instance != nullptr ? instance->stats() : Stats{};
  uint64_t values[] = {s.live, s.kept, s.peak_live, s.reused, s.assembled, s.mapped, s.moved_bytes, s.fresh_bytes};
  std::copy(std::begin(values), std::end(values), out);
}
}
