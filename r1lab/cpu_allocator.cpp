// torch's CPU allocator for a large model's training process: blocks freed by one step are handed to the next
// request of the same size, without letting the memory held grow past the highest the live blocks ever needed.
// Compiled on first use and installed by r1lab/cpu_allocator.py.
//
// Why: a training step at the Qwen2.5-0.5B shape allocates and frees gigabytes of activations and temporaries.
// Served by mmap and returned at each free (the policy that keeps the peak down, r1lab/runtime.py), every block is
// new memory that the kernel must fault in and zero: about a third of the forward and backward's time. Kept in
// glibc's heap, the same blocks fragment and the peak rises by 0.7 GB. Here a freed block of LARGE bytes or more is
// kept for a request of exactly its size (a step's activations repeat, layer after layer and step after step); the
// blocks kept are unmapped, oldest first, whenever keeping them would take the live plus kept bytes past the highest
// live total seen so far, so the process never holds more than it held at its own peak.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdint>
#include <deque>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t PAGE = 4096;

struct Stats {
  size_t live = 0, kept = 0, peak_live = 0;
  uint64_t reused = 0, mapped = 0, unmapped = 0;
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

  // Unmap every kept block (before a phase that needs the memory for something else).
  void drop_kept() {
    std::lock_guard<std::mutex> g(mutex_);
    while (!order_.empty()) unmap_oldest();
  }

 private:
  static size_t round_up(size_t n) { return (n + PAGE - 1) / PAGE * PAGE; }

  void* take(size_t size) {
    {
      std::lock_guard<std::mutex> g(mutex_);
      auto bin = free_.find(size);
      if (bin != free_.end() && !bin->second.empty()) {
        void* p = bin->second.back();
        bin->second.pop_back();
        stats_.kept -= size;
        forget_order(p);
        note_live(p, size);
        stats_.reused++;
        return p;
      }
      // a new block: first make room for it under the highest live total seen
      while (!order_.empty() && stats_.live + stats_.kept + size > std::max(stats_.peak_live, stats_.live + size))
        unmap_oldest();
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      drop_kept();
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "r1lab's CPU allocator: out of memory allocating ", size, " bytes");
    }
    std::lock_guard<std::mutex> g(mutex_);
    stats_.mapped++;
    note_live(p, size);
    return p;
  }

  void note_live(void* p, size_t size) {
    sizes_[p] = size;
    stats_.live += size;
    stats_.peak_live = std::max(stats_.peak_live, stats_.live);
  }

  bool give_back(void* p) {
    std::lock_guard<std::mutex> g(mutex_);
    auto it = sizes_.find(p);
    if (it == sizes_.end()) return false;
    size_t size = it->second;
    sizes_.erase(it);
    stats_.live -= size;
    free_[size].push_back(p);
    order_.push_back({p, size});
    stats_.kept += size;
    return true;
  }

  void unmap_oldest() {
    auto [p, size] = order_.front();
    order_.pop_front();
    auto& bin = free_[size];
    for (auto it = bin.begin(); it != bin.end(); ++it)
      if (*it == p) {
        bin.erase(it);
        break;
      }
    stats_.kept -= size;
    stats_.unmapped++;
    munmap(p, size);
  }

  void forget_order(void* p) {
    for (auto it = order_.begin(); it != order_.end(); ++it)
      if (it->first == p) {
        order_.erase(it);
        return;
      }
  }

  const size_t large_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;                // live blocks of ours
  std::unordered_map<size_t, std::vector<void*>> free_;    // kept blocks by size
  std::deque<std::pair<void*, size_t>> order_;             // kept blocks, oldest first
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

// live, kept, peak_live, reused, mapped, unmapped
void r1lab_stats(uint64_t* out) {
  Stats s = instance != nullptr ? instance->stats() : Stats{};
  out[0] = s.live, out[1] = s.kept, out[2] = s.peak_live, out[3] = s.reused, out[4] = s.mapped, out[5] = s.unmapped;
}
}
