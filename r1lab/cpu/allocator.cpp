// torch's CPU allocator for a large model's training process: blocks freed by one step are handed to the next
// request of the same size, without letting the memory held grow past the highest the live blocks ever needed.
// Compiled on first use and installed by r1lab/cpu/allocator.py.
//
// Why: a training step at the Qwen2.5-0.5B shape allocates and frees gigabytes of activations and temporaries.
// Served by mmap and returned at each free (the policy that keeps the peak down, r1lab/cpu/process.py), every block is
// new memory that the kernel must fault in and zero: about a third of the forward and backward's time. Kept in
// glibc's heap, the same blocks fragment and the peak rises by 0.7 GB. Here a freed block of LARGE bytes or more is
// kept. A request of a kept block's exact size takes it (a step's activations repeat, layer after layer and step
// after step); any other request is assembled from kept blocks by moving their pages into a new range with mremap:
// the pages stay resident and filled, only their addresses change, so no block is ever faulted in while kept
// memory is left, and what is held (live + kept) never passes the highest live total seen.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace {

constexpr size_t PAGE = 4096;

struct Stats {
  size_t live = 0, kept = 0, peak_live = 0;
  uint64_t reused = 0, assembled = 0, mapped = 0, moved_bytes = 0, fresh_bytes = 0, failed_moves = 0, drops = 0;
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
    unmap_kept();
  }

  // fork(): no other thread may hold the lock while the address space is copied (the child has only the forking
  // thread, and would wait forever on a lock taken by another one)
  void before_fork() { mutex_.lock(); }
  void after_fork_in_parent() { mutex_.unlock(); }
  void after_fork_in_child() { new (&mutex_) std::mutex(); }

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
      if (++assembled_since_check_ >= CHECK_MAPPINGS_EVERY) {
        assembled_since_check_ = 0;
        if (mapping_count() > max_mappings() / 2) unmap_kept();
      }
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED && !kept_.empty()) {  // out of memory or of mappings: what is kept goes first
        unmap_kept();
        p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      }
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
      if (mremap(src, piece, piece, MREMAP_MAYMOVE | MREMAP_FIXED, dst + filled) == MAP_FAILED) {
        stats_.failed_moves++;
        break;
      }
      kept_.erase(it);
      stats_.kept -= block;
      char* rest = static_cast<char*>(src) + piece;
      if (block - piece >= large_) {  // the rest stays kept; a smaller one would only fragment what is kept
        kept_.emplace(block - piece, rest);
        stats_.kept += block - piece;
      } else if (block > piece) {
        munmap(rest, block - piece);
      }
      filled += piece;
    }
    return filled;
  }

  // Pages moved in from several blocks make a block of several kernel mappings (they do not merge), so mappings
  // accumulate, about 800 per step at the Qwen2.5-0.5B shape; past vm.max_map_count (65,530 by default) mmap would
  // fail. So every CHECK_MAPPINGS_EVERY new blocks the mappings are counted, and past half the limit the kept blocks
  // are unmapped: the next step faults their memory in once more, and the count starts again from the live blocks.
  // The limit is vm.max_map_count, or R1LAB_ALLOCATOR_MAX_MAPPINGS where other code needs its share of it.
  static constexpr uint64_t CHECK_MAPPINGS_EVERY = 2048;

  void unmap_kept() {
    for (auto& [size, p] : kept_) munmap(p, size);
    kept_.clear();
    stats_.kept = 0;
    stats_.drops++;
  }

  static size_t mapping_count() {
    int fd = open("/proc/self/maps", O_RDONLY);
    if (fd < 0) return 0;
    size_t lines = 0;
    char buf[1 << 16];
    for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) lines += std::count(buf, buf + n, '\n');
    close(fd);
    return lines;
  }

  static size_t max_mappings() {
    static const size_t limit = [] {
      if (const char* set = getenv("R1LAB_ALLOCATOR_MAX_MAPPINGS")) return static_cast<size_t>(strtoul(set, nullptr, 10));
      FILE* f = fopen("/proc/sys/vm/max_map_count", "r");
      unsigned long value = 65530;
      if (f != nullptr) {
        if (fscanf(f, "%lu", &value) != 1) value = 65530;
        fclose(f);
      }
      return static_cast<size_t>(value);
    }();
    return limit;
  }

  uint64_t assembled_since_check_ = 0;
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
    pthread_atfork([] { instance->before_fork(); }, [] { instance->after_fork_in_parent(); },
                   [] { instance->after_fork_in_child(); });
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

// live, kept, peak_live, reused, assembled, mapped, moved_bytes, fresh_bytes, failed_moves, drops
void r1lab_stats(uint64_t* out) {
  Stats s = instance != nullptr ? instance->stats() : Stats{};
  uint64_t values[] = {s.live,      s.kept,        s.peak_live,   s.reused,      s.assembled,
                       s.mapped,    s.moved_bytes, s.fresh_bytes, s.failed_moves, s.drops};
  std::copy(std::begin(values), std::end(values), out);
}
}
